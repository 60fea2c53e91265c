"""Programs built only from mqtun's public API; the CLI parses arguments and calls these."""
