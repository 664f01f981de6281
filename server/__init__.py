"""Server side: the Flower ServerApp, item-side aggregation, run outputs."""
