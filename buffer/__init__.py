"""The buffer hub service: trajectory table, staleness gate, admission credits, prompt dispenser."""
