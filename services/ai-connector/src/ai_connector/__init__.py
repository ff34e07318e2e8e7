"""The ai-connector: sends stable studies chosen by rules to inference services and stores their results."""
