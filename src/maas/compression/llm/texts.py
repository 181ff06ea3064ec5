"""The fixed evaluation set for language models: short English paragraphs (perplexity) and chat prompts (greedy
answers). Written for maas, varied in topic and register, and never changed: numbers measured months apart stay
comparable. A recipe may name its own texts (``evaluation: {dataset: package.module:function}``)."""

from __future__ import annotations

PARAGRAPHS: tuple[str, ...] = (
    "The kettle clicked off just as the rain began. Mara poured the water over the leaves, watched them unfurl, "
    "and carried the cup to the window. Across the street, a man in a yellow coat was trying to persuade a small "
    "dog that puddles were not, in fact, dangerous. The dog was not convinced.",
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant cells, chlorophyll "
    "absorbs mostly red and blue light, and the energy drives the splitting of water into oxygen, protons and "
    "electrons. The electrons pass along a chain of proteins, and the energy they release is stored in ATP and "
    "NADPH, which the cell then uses to fix carbon dioxide into sugar.",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a wide pan over medium heat. Add a "
    "finely chopped onion and a pinch of salt, and cook until soft, about eight minutes. Stir in two cloves of "
    "garlic, then a can of crushed tomatoes. Let it simmer for twenty minutes, taste, and finish with basil.",
    "The Roman road network stretched for more than eighty thousand kilometres at its height. Roads were built in "
    "layers: large stones at the bottom, then gravel and sand, and finally fitted paving stones on top. Milestones "
    "marked the distance to the next town, and way stations let official messengers change horses quickly.",
    "A hash table stores values under keys. It computes a hash of each key and uses it to pick a bucket in an "
    "array, so a lookup usually takes constant time. When two keys land in the same bucket, the table resolves "
    "the collision, for example by keeping a short list in each bucket, and it grows the array when it fills up.",
    "Interest compounds when the interest earned is added to the principal and itself earns interest. A deposit "
    "of one thousand dollars at five percent a year grows to about one thousand six hundred and twenty-nine "
    "dollars after ten years. The same rule works against borrowers: unpaid credit card balances can grow fast.",
    "Every autumn, millions of monarch butterflies fly from Canada and the United States to a few mountain forests "
    "in central Mexico. None of them has made the trip before; the butterflies that return north in spring are "
    "their great-grandchildren. Scientists believe they navigate using the position of the sun and an internal clock.",
    "The match was level at one goal each with ten minutes to play. The visitors had most of the ball, but the home "
    "side defended deep and waited. Then a long pass found the winger on the left, who beat his defender, cut "
    "inside and curled the ball into the far corner. The stadium erupted, and the coach finally sat down.",
    "Dear Mr. Alvarez, thank you for your letter of March the fourth. I am sorry to hear that the chair you ordered "
    "arrived with a damaged leg. We will send a replacement part this week at no cost to you, and a courier will "
    "collect the damaged piece. Please let me know if there is anything else we can do. Kind regards, Helen.",
    "Mount Everest rises about eight thousand eight hundred and forty-nine metres above sea level. The air at the "
    "summit holds roughly a third of the oxygen available at sea level, so most climbers use bottled oxygen. The "
    "best weather usually comes in May, in a short window between the winter winds and the summer monsoon.",
    "Before you replace a light switch, turn off the power at the breaker and check with a tester that the wires "
    "are dead. Unscrew the cover plate and the switch, and note which wire goes to which terminal. Connect the new "
    "switch the same way, fold the wires back into the box, and screw everything in place before restoring power.",
    "The library was quiet except for the hum of the old radiator. Theo had come to return a book, but he found "
    "himself wandering between the shelves, reading titles he did not understand. In the last aisle, an envelope "
    "stuck out of an atlas. It was addressed to him, in his grandmother's handwriting, and dated forty years ago.",
    "Vaccines train the immune system to recognise a pathogen without causing the disease. Most contain a weakened "
    "or inactivated virus, a piece of it such as a protein, or instructions for making that protein. The body "
    "responds by producing antibodies and memory cells, which can react quickly if the real pathogen appears later.",
    "The city council voted on Tuesday to extend the tram line by four kilometres to the new hospital. Construction "
    "is expected to start next spring and to take two years. Supporters said the line would cut traffic on the "
    "ring road, while some shop owners on the route worried about the months of roadworks ahead of them.",
    "Good sleep depends more on habits than on gadgets. Going to bed and getting up at the same time every day "
    "keeps the body clock steady. A cool, dark room helps, and so does avoiding caffeine in the afternoon. If you "
    "cannot fall asleep after twenty minutes, get up and do something calm until you feel tired.",
    "Jazz grew out of the music of African American communities in New Orleans at the start of the twentieth "
    "century. It mixed blues, ragtime and brass band marches, and it gave musicians room to improvise. Within a few "
    "decades it had spread across the world and changed into swing, bebop, cool jazz and many other styles.",
)

PROMPTS: tuple[str, ...] = (
    "What is the capital of Australia?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "Give me three tips for learning a new language.",
    "What is 12 times 7?",
    "Write a Python function that returns the largest number in a list.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How do I boil an egg?",
)


def paragraphs() -> list[str]:
    """The default perplexity texts, as a dataset factory a recipe can name."""
    return list(PARAGRAPHS)
