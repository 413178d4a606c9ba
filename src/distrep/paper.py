"""The paper's reported numbers (Oursland 2025): test accuracy in %, mean and std over 20 runs."""

TABLES: dict[str, dict[str, tuple[float, float]]] = {
    # output layer without bias, 5,000 epochs
    "table1": {"Abs": (95.87, 0.22), "ReLU": (96.62, 0.17), "Abs2": (95.95, 0.17),
               "Abs2-Neg": (92.25, 2.07), "ReLU2": (56.31, 19.31), "ReLU2-Neg": (96.46, 0.17)},
    # output bias included, 5,000 epochs
    "table2": {"Abs-Bias": (95.23, 0.16), "ReLU-Bias": (95.69, 0.17), "Abs2-Bias": (95.38, 0.17),
               "Abs2-Neg-Bias": (90.53, 2.36), "ReLU2-Bias": (39.94, 18.84),
               "ReLU2-Neg-Bias": (94.92, 0.18)},
    # OffsetL2 output layers, 50,000 epochs
    "table3": {"ReLU-L2": (97.33, 0.13), "ReLU-L2-Neg": (97.36, 0.14), "Abs-L2": (97.61, 0.07),
               "Abs-L2-Neg": (97.56, 0.09)},
}

# Epochs each table was trained for; the paper used 20 runs, full MNIST, lr 0.001.
TABLE_EPOCHS = {"table1": 5000, "table2": 5000, "table3": 50000}

# Activation-clamping drop-off points (p %, where test accuracy falls to half), author's notes.
CLAMP_DROPOFF = {
    "floor": {"Abs2-Neg": 38, "Abs": 35, "Abs2": 15, "ReLU2-Neg": 11, "ReLU": 9, "ReLU2": 8},
    "ceiling": {"Abs2-Neg": 35, "Abs": 30, "Abs2": 8, "ReLU": 1, "ReLU2": 1, "ReLU2-Neg": 1},
}


def paper_value(model: str) -> tuple[str, float, float] | None:
    """(table, mean, std) the paper reports for a model name, or None."""
    for table, rows in TABLES.items():
        if model in rows:
            return (table, *rows[model])
    return None
