DROP TABLE events;
DROP TABLE streams;
