"""Training recipes: one linear file per algorithm."""
