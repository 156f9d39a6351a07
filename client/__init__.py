"""dpfl ClientApp: local DP-SGD (Opacus) with a persistent privacy ledger."""
