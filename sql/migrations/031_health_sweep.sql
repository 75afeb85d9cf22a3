-- 031_health_sweep.sql: the Stripe events the health sweep retries.
--
-- The webhook (010) stores an event it cannot apply yet as 'deferred' (its account
-- is not linked yet: a transient reason; Stripe retries too, but only for three
-- days and on its own schedule). 'failed' is a permanent error (unknown price, bad
-- payload) that only an operator's reprocess after a fix can cure, so the sweep
-- leaves it alone. 'received' left behind is a delivery interrupted before its
-- transaction finished; the webhook applies an event in the same transaction that
-- stores it, so one still 'received' a minute later is owed too.
--
-- Backoff per event from its attempts and last touch: 30 s * 2^attempts, at most
-- an hour, so a permanently unlinkable event costs one call an hour.
CREATE OR REPLACE FUNCTION public.health_owed_stripe_events(p_limit integer)
RETURNS TABLE (id text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, public
AS $$
    SELECT e.id
      FROM public.stripe_events e
     WHERE (e.status = 'deferred'
            OR (e.status = 'received' AND e.received_at < now() - interval '1 minute'))
       AND e.updated_at <= now() - make_interval(secs =>
               least(3600, 30 * power(2, least(e.attempts, 20))::double precision))
     ORDER BY e.updated_at
     LIMIT greatest(p_limit, 0);
$$;

REVOKE ALL ON FUNCTION public.health_owed_stripe_events(integer) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.health_owed_stripe_events(integer) TO service_role;
