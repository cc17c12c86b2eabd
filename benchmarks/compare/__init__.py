"""`persistrnn compare`: LSTM or GRU, measured. Parameters (formula and modules), speed and memory
per cell, learning ability on tasks with known baselines over seeds, and a verdict per common
claim. See run.py for the command, tasks.py for the tasks and their baselines."""
