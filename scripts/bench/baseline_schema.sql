-- The webhook benchmark's baseline (scripts/bench/baseline.sql): the minimal
-- transaction a Stripe webhook needs, on two tables of its own. Created in a
-- database of its own by scripts/bench/webhook_bench.py; never part of the schema.
DROP TABLE IF EXISTS bench_events, bench_subscriptions;
CREATE TABLE bench_events (
    id      text PRIMARY KEY,
    type    text,
    created bigint,
    payload text
);
CREATE TABLE bench_subscriptions (
    id                 text PRIMARY KEY,
    customer           text,
    status             text,
    price              text,
    last_event_created bigint
);
