"""Planning: a recipe becomes a DAG of keyed stages."""
