"""The hsm-migrator: moves instances between storage tiers (hot, warm, cold) by policy and restores archived objects."""
