"""Site side: the Flower ClientApp and DP-SGD local training."""
