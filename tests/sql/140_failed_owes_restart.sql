-- 140_failed_owes_restart.sql: an instance the health check marks failed owes a
-- restart as well as its redeploy (one restart, however many were asked before).
BEGIN;
\ir _helpers.inc
SELECT plan(6);

INSERT INTO auth.users (id, aud, role, email)
VALUES ('14000000-0000-4000-8000-000000000001', 'authenticated', 'authenticated', 'h140@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('1400000' || n || '-0000-4000-8000-000000000100')::uuid, '14000000-0000-4000-8000-000000000001',
       'price_starter', 'starter', 'active'
  FROM generate_series(1, 2) n;
-- Two running instances as a finished deploy leaves them; the second has a tenant's
-- restart owed (asked twice: one restart).
INSERT INTO public.instances (id, subscription_id, dokku_app_name, subdomain, status, desired_status,
                              backend_url, applied_config_version, welcome_email_sent_at,
                              restart_version, applied_restart_version)
SELECT ('14000000-0000-4000-8000-00000000020' || n)::uuid, s.id, nm.dokku_app_name, nm.subdomain,
       'running', 'running', 'http://127.0.0.1:1/i/' || n, 1, now(),
       CASE WHEN n = 2 THEN 4 ELSE 2 END, 2
  FROM generate_series(1, 2) n
  JOIN public.subscriptions s ON s.id = ('1400000' || n || '-0000-4000-8000-000000000100')::uuid
  CROSS JOIN LATERAL public.instance_names(s.id) nm;

CREATE FUNCTION pg_temp.round(p_round integer) RETURNS SETOF boolean LANGUAGE sql AS $$
    SELECT marked_failed FROM public.health_record(
        '[{"instance_id": "14000000-0000-4000-8000-000000000201", "ok": false, "health_status": "unreachable"},
          {"instance_id": "14000000-0000-4000-8000-000000000202", "ok": false, "health_status": "unreachable"}]',
        3, true, now() + make_interval(secs => 60 * p_round), 60)
$$;
CREATE FUNCTION pg_temp.restarts(p_n integer) RETURNS TABLE (asked bigint, applied bigint, owed text)
LANGUAGE sql AS $$
    SELECT restart_version, applied_restart_version, owed_action::text FROM public.instances
     WHERE id = ('14000000-0000-4000-8000-00000000020' || p_n)::uuid
$$;

SELECT pg_temp.round(1);
SELECT pg_temp.round(2);
SELECT results_eq($$SELECT * FROM pg_temp.restarts(1)$$, $$VALUES (2::bigint, 2::bigint, NULL::text)$$,
                  'failures below the threshold owe nothing');
SELECT results_eq($$SELECT bool_and(f) FROM pg_temp.round(3) f$$, $$VALUES (true)$$,
                  'the third failure marks both failed');
SELECT results_eq($$SELECT * FROM pg_temp.restarts(1)$$, $$VALUES (3::bigint, 2::bigint, 'create')$$,
                  'marked failed: a redeploy owed, and a restart after it');
SELECT results_eq($$SELECT * FROM pg_temp.restarts(2)$$, $$VALUES (4::bigint, 2::bigint, 'create')$$,
                  'a restart already owed stays the one owed');
-- The redeploy done without restarting the apps (its result has no restart_version):
-- the restart is owed next; with a restart_version it is done.
UPDATE public.instances SET status = 'provisioning' WHERE id = '14000000-0000-4000-8000-000000000201';
UPDATE public.instances SET status = 'running', next_attempt_at = NULL, last_error = NULL
 WHERE id = '14000000-0000-4000-8000-000000000201';
SELECT results_eq($$SELECT * FROM pg_temp.restarts(1)$$, $$VALUES (3::bigint, 2::bigint, 'restart')$$,
                  'running again, the restart is owed');
SELECT is(pg_temp.cell('14000000-0000-4000-8000-000000000001', $$SELECT public.health_record('[]', 3, true, now(), 60)$$),
          'err:42501', 'a user may not record health');

SELECT * FROM finish();
ROLLBACK;
