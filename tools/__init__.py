"""tools: helpers around the pipeline (synthetic MT30 data, measurements)."""
