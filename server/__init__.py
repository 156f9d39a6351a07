"""dpfl ServerApp: FedAvg with reply validation, central evaluation and run records."""
