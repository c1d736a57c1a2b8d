"""Shared pieces every recipe needs and the guards for known fine-tuning traps."""
