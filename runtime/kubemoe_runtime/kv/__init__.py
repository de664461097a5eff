"""KV hand-off between a prefill group and a decode group (P/D disaggregation, torch engine)."""
