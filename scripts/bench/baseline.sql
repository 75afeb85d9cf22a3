-- pgbench script: the minimal webhook transaction, the baseline of `make bench`'s
-- events section (scripts/bench/webhook_bench.py runs it with -M prepared -c 8 -j 2,
-- fsync on, on the tables of baseline_schema.sql). Per transaction, with a random
-- id: record the event (a 900-byte payload, given as -D payload=...) unless it is
-- known, and upsert its subscription unless a newer event already wrote it.
\set r random(1, 1000000000000000)
\set t random(1700000000, 1800000000)
BEGIN;
INSERT INTO bench_events (id, type, created, payload)
VALUES ('evt_' || :r, 'customer.subscription.updated', :t, :payload)
ON CONFLICT DO NOTHING;
INSERT INTO bench_subscriptions (id, customer, status, price, last_event_created)
VALUES ('sub_' || :r, 'cus_' || :r, 'active', 'price_starter', :t)
ON CONFLICT (id) DO UPDATE SET status = excluded.status, last_event_created = excluded.last_event_created
WHERE bench_subscriptions.last_event_created <= excluded.last_event_created;
COMMIT;
