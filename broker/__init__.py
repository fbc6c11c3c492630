"""inferq broker layer: topology, codec, wire messages, connections, the job ledger."""
