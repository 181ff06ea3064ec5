import pytest

from maas.errors import InvalidInput
from maas.registry import ModelRef, parse_ref, validate_alias, validate_name


@pytest.mark.parametrize("name", ["digits", "minilm-int8", "a.b_c-1", "A1", "x" * 128])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../etc", "a/b", "a\\b", "..", ".hidden", "-x", "a..b", "x" * 129, "名前", "a b", "a\x00b", "/abs"]
)
def test_invalid_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_name(name)
    assert "letters, digits" in str(info.value) or "limit" in str(info.value) or "empty" in str(info.value)


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("models:/digits/3", ModelRef("digits", version=3)),
        ("models:/digits@production", ModelRef("digits", alias="production")),
        ("models:/digits", ModelRef("digits")),
        ("digits/12", ModelRef("digits", version=12)),
        ("digits@staging", ModelRef("digits", alias="staging")),
        ("digits@latest", ModelRef("digits", alias="latest")),
    ],
)
def test_parse_ref(text: str, ref: ModelRef) -> None:
    assert parse_ref(text) == ref


@pytest.mark.parametrize(
    "text", ["models:/digits/0", "models:/digits/x", "models:/digits/1/2", "models:/../x/1", "s3://b/k", "digits@Prod"]
)
def test_bad_refs(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_ref(text)


def test_aliases() -> None:
    assert validate_alias("production") == "production"
    for bad in ["Production", "1st", "latest", "a/b", "", "x" * 64]:
        with pytest.raises(InvalidInput):
            validate_alias(bad)


@pytest.mark.parametrize("text", ["lin\n", "production\n"])
def test_trailing_newline_is_not_a_valid_name(text: str) -> None:
    with pytest.raises(InvalidInput):
        validate_name(text)
    with pytest.raises(InvalidInput):
        validate_alias(text)


@pytest.mark.parametrize("text", ["²", "0", "-1", "99999999999", "1e3", " 1"])
def test_bad_version_numbers(text: str) -> None:
    from maas.registry.uri import parse_version

    with pytest.raises(InvalidInput):
        parse_version(text)
