-- Run once, when the database is first initialised (both the official postgres
-- image and the local stand-in run /docker-entrypoint-initdb.d/*.sql).
-- pg_stat_statements (preloaded by the compose file's postgres command) counts
-- calls per statement: docs/deployment.md uses it to measure polling load.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
