-- The knowledge graph's read model, in the graph service's own database. Names compare byte-wise
-- (COLLATE "C"), as the in-memory graph's do.
CREATE SCHEMA IF NOT EXISTS graph;

CREATE TABLE graph.entities (
    entity   text COLLATE "C" PRIMARY KEY,
    mentions integer NOT NULL
);

CREATE TABLE graph.entity_topics (
    entity text COLLATE "C" NOT NULL,
    topic  text COLLATE "C" NOT NULL,
    PRIMARY KEY (entity, topic)
);

-- Both directions of each co-occurrence, so a walk follows one index.
CREATE TABLE graph.edges (
    source text COLLATE "C" NOT NULL,
    target text COLLATE "C" NOT NULL,
    weight integer NOT NULL,
    PRIMARY KEY (source, target)
);
