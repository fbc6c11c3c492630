"""inferq edge: the HTTP API and the job ledger projection."""
