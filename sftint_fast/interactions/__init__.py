"""Interactions computed from a game's output vector ``v`` alone (never imports the engine)."""
