"""``dpe samples export``: accepted samples as training files (`export`), and its command (`cli`)."""
