"""What differs between the models of the StarCoder family: shapes read from checkpoints, and the catalogue."""
