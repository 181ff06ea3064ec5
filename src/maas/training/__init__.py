"""Training: one loop, strategies composed around it, launched through torchrun's elastic agent."""
