"""Data synthesis from user texts: attributes, perspectives, tasks, instructions."""
