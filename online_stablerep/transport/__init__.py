"""Transport of caption groups from generator ranks to trainer ranks over gloo, under credit."""
