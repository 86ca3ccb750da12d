DROP TABLE dead_letters;
DROP TABLE subscription_checkpoints;
