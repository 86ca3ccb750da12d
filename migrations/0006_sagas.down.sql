DROP TABLE saga_timeouts;
DROP TABLE saga_commands;
DROP TABLE saga_instances;
