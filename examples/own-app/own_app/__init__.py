"""A Flower app of its own: a small CNN and data made on the fly, trained by a fedvb strategy."""
