"""Figure code (matplotlib). Plots read only the shared timeline / result tables."""
