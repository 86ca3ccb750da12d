DROP TABLE personal_streams;
DROP TABLE personal_keys;
