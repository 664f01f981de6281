"""Code both sides import: data, model, metrics, privacy contract. No Flower imports here."""
