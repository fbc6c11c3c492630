"""inferq actors: the shard worker and its parts, the dead-letter reaper."""
