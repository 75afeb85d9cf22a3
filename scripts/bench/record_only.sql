-- An experiment for the webhook section (docs/benchmarks.md, "Recording alone"):
--   BENCH_EXPERIMENT_SQL=scripts/bench/record_only.sql scripts/bench.sh webhook
-- Every event type is given no kind, so every delivery takes the ignored path of
-- process_stripe_event: one insert into stripe_events, and nothing applied (no
-- subscription, instance, audit row or wake). What is left is the least a delivery
-- can do: the ceiling of a webhook that records events and applies them later.
-- Never run on a database that serves anyone.
CREATE OR REPLACE FUNCTION public.stripe_event_kind(p_type text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = ''
AS $$ SELECT NULL::text $$;
