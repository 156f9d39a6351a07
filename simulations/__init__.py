"""The simulation harness: `dpfl simulate`, benchmarks."""
