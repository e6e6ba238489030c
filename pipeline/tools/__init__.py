"""Tools around training: the environment doctor, the offline sharding planner, run reports."""
