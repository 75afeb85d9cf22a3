-- 30_health.sql: health_record() (030_health.sql, 042_health_once.sql).
BEGIN;
SELECT plan(29);

-- Fixtures: one account, three entitled subscriptions, their instances.
INSERT INTO auth.users (id, aud, role, email)
VALUES ('30000000-0000-4000-8000-000000000001', 'authenticated', 'authenticated', 'health@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('3000000' || n || '-0000-4000-8000-000000000100')::uuid, '30000000-0000-4000-8000-000000000001',
       'price_starter', 'starter', 'active'
  FROM generate_series(1, 4) n;
INSERT INTO public.instances (id, subscription_id, dokku_app_name, subdomain, status, backend_url)
SELECT ('30000000-0000-4000-8000-00000000020' || n)::uuid, s.id, nm.dokku_app_name, nm.subdomain,
       CASE WHEN n = 4 THEN 'stopped' ELSE 'running' END::public.instance_status,
       'http://127.0.0.1:1/i/' || n
  FROM generate_series(1, 4) n
  JOIN public.subscriptions s ON s.id = ('3000000' || n || '-0000-4000-8000-000000000100')::uuid
  CROSS JOIN LATERAL public.instance_names(s.id) nm;

CREATE FUNCTION pg_temp.fail(p_id text, p_hs text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_array(jsonb_build_object('instance_id', p_id, 'ok', false,
                                                'health_status', p_hs, 'error', 'detail of ' || p_hs));
$$;
-- A round n intervals (60 s) from now, by a caller whose failures count (or not).
CREATE FUNCTION pg_temp.rec(p_results jsonb, p_threshold integer, p_round integer,
                            p_counted boolean DEFAULT true)
RETURNS TABLE (instance_id uuid, consecutive_failures integer, marked_failed boolean)
LANGUAGE sql AS $$
    SELECT * FROM public.health_record(p_results, p_threshold, p_counted,
                                       now() + make_interval(secs => 60 * p_round), 60);
$$;

-- 1. A failure counts, records the status and the error.
SELECT is((SELECT consecutive_failures FROM pg_temp.rec(pg_temp.fail('30000000-0000-4000-8000-000000000201', 'unhealthy: HTTP 500'), 3, 1)),
          1, 'a failed probe counts 1');
SELECT results_eq($$SELECT health_status, error_message, status::text, last_health_check IS NOT NULL
                      FROM public.instances WHERE id = '30000000-0000-4000-8000-000000000201'$$,
                  $$VALUES ('unhealthy: HTTP 500', 'detail of unhealthy: HTTP 500', 'running', true)$$,
                  'health_status, error_message and last_health_check recorded, still running');

-- 2. A healthy probe resets the count and clears the error.
SELECT is((SELECT consecutive_failures FROM pg_temp.rec(
              '[{"instance_id": "30000000-0000-4000-8000-000000000201", "ok": true, "health_status": "healthy", "error": null}]', 3, 100)),
          0, 'a healthy probe resets the count');
SELECT results_eq($$SELECT health_status, error_message FROM public.instances
                     WHERE id = '30000000-0000-4000-8000-000000000201'$$,
                  $$VALUES ('healthy', NULL::text)$$, 'healthy recorded, error cleared');

-- 3. The threshold marks failed, owed a redeploy now.
SELECT is((SELECT marked_failed FROM pg_temp.rec(pg_temp.fail('30000000-0000-4000-8000-000000000201', 'unreachable: timeout after 100 ms'), 3, 2)),
          false, 'failure 1 of 3: not failed');
SELECT is((SELECT marked_failed FROM pg_temp.rec(pg_temp.fail('30000000-0000-4000-8000-000000000201', 'unreachable: timeout after 100 ms'), 3, 3)),
          false, 'failure 2 of 3: not failed');
SELECT results_eq($$SELECT consecutive_failures, marked_failed FROM pg_temp.rec(pg_temp.fail('30000000-0000-4000-8000-000000000201', 'unreachable: timeout after 100 ms'), 3, 4)$$,
          $$VALUES (3, true)$$, 'failure 3 of 3: marked failed');
SELECT results_eq($$SELECT status::text, next_attempt_at <= now(), last_error
                      FROM public.instances WHERE id = '30000000-0000-4000-8000-000000000201'$$,
                  $$VALUES ('failed', true, 'health: unreachable: timeout after 100 ms (3 checks in a row)')$$,
                  'failed, next_attempt_at now, last_error says why');
SELECT ok(EXISTS (SELECT 1 FROM public.audit_logs WHERE action = 'instance.status_changed'
                     AND details->>'instance_id' = '30000000-0000-4000-8000-000000000201'
                     AND details->>'to' = 'failed'), 'the transition is audited');
SELECT results_eq($$SELECT owed_action::text, owed_due_at <= now() FROM public.instances
                     WHERE id = '30000000-0000-4000-8000-000000000201'$$,
                  $$VALUES ('create', true)$$,
                  'a redeploy (create) is owed now');

-- 3b. A redeploy (failed -> provisioning -> running) starts the count afresh.
UPDATE public.instances SET status = 'provisioning' WHERE id = '30000000-0000-4000-8000-000000000201';
UPDATE public.instances SET status = 'running' WHERE id = '30000000-0000-4000-8000-000000000201';
SELECT is((SELECT consecutive_failures FROM public.instances WHERE id = '30000000-0000-4000-8000-000000000201'),
          0, 'running again: failures reset');
SELECT is((SELECT marked_failed FROM pg_temp.rec(pg_temp.fail('30000000-0000-4000-8000-000000000201', 'unhealthy: HTTP 500'), 3, 5)),
          false, 'one failure after a redeploy does not fail it again');
UPDATE public.instances SET status = 'failed' WHERE id = '30000000-0000-4000-8000-000000000201';

-- 4. A row no longer running is not touched.
SELECT is((SELECT count(*)::int FROM pg_temp.rec(pg_temp.fail('30000000-0000-4000-8000-000000000201', 'unhealthy: HTTP 500'), 1, 6)),
          0, 'a failed instance is not recorded again');
SELECT is((SELECT count(*)::int FROM pg_temp.rec(pg_temp.fail('30000000-0000-4000-8000-000000000204', 'unhealthy: HTTP 500'), 1, 7)),
          0, 'a stopped instance is not recorded');
SELECT is((SELECT health_status FROM public.instances WHERE id = '30000000-0000-4000-8000-000000000204'),
          NULL, 'the stopped instance keeps its health columns');

-- 5. Under a live lease: recorded, not counted, never failed.
UPDATE public.instances SET claimed_by = 'other', claim_expires_at = now() + interval '1 minute',
                            claim_action = 'update'
 WHERE id = '30000000-0000-4000-8000-000000000202';
SELECT results_eq($$SELECT consecutive_failures, marked_failed FROM pg_temp.rec(pg_temp.fail('30000000-0000-4000-8000-000000000202', 'unhealthy: HTTP 502'), 1, 8)$$,
          $$VALUES (0, false)$$, 'a leased instance is not counted nor failed');
SELECT results_eq($$SELECT status::text, health_status FROM public.instances
                     WHERE id = '30000000-0000-4000-8000-000000000202'$$,
                  $$VALUES ('running', 'unhealthy: HTTP 502')$$, 'but its health is recorded');

-- 6. Owed a stop: never failed (failed would make the stop owe nothing).
UPDATE public.instances SET desired_status = 'stopped' WHERE id = '30000000-0000-4000-8000-000000000203';
SELECT results_eq($$SELECT consecutive_failures, marked_failed FROM pg_temp.rec(pg_temp.fail('30000000-0000-4000-8000-000000000203', 'unhealthy: HTTP 500'), 1, 9)$$,
          $$VALUES (1, false)$$, 'an instance owed a stop is counted but not failed');

-- 7. Bad input is refused, nothing written.
SELECT throws_ok($$SELECT * FROM public.health_record('{}', 3, true, NULL, 60)$$, '22023', NULL, 'results must be an array');
SELECT throws_ok($$SELECT * FROM public.health_record('[]', 0, true, NULL, 60)$$, '22023', NULL, 'threshold must be >= 1');
SELECT throws_ok($$SELECT * FROM public.health_record('[]', 3, true, NULL, 0)$$, '22023', NULL, 'interval must be >= 1');

-- 8. Least privilege.
SELECT ok(NOT has_function_privilege('authenticated', 'public.health_record(jsonb, integer, boolean, timestamptz, integer)', 'EXECUTE'),
          'tenants cannot record health');
SELECT ok(has_function_privilege('service_role', 'public.health_record(jsonb, integer, boolean, timestamptz, integer)', 'EXECUTE'),
          'service_role can');

-- 9. Once per interval, whoever probes; a tenant's probe never counts.
UPDATE public.instances SET status = 'running', consecutive_failures = 0, health_counted_at = NULL,
                            claimed_by = NULL, claim_expires_at = NULL, claim_action = NULL
 WHERE id = '30000000-0000-4000-8000-000000000202';
SELECT is((SELECT consecutive_failures FROM pg_temp.rec(
              pg_temp.fail('30000000-0000-4000-8000-000000000202', 'unhealthy: HTTP 500'), 3, 200)),
          1, 'the first failure of an interval counts');
SELECT is((SELECT consecutive_failures FROM public.health_record(
              pg_temp.fail('30000000-0000-4000-8000-000000000202', 'unhealthy: HTTP 500'), 3, true,
              now() + make_interval(secs => 60 * 200 + 59), 60)),
          1, 'a second host, or an operator, in the same interval adds nothing');
SELECT is((SELECT consecutive_failures FROM pg_temp.rec(
              pg_temp.fail('30000000-0000-4000-8000-000000000202', 'unhealthy: HTTP 500'), 3, 201, false)),
          1, 'a tenant''s probe is recorded but not counted');
SELECT is((SELECT health_status FROM public.instances WHERE id = '30000000-0000-4000-8000-000000000202'),
          'unhealthy: HTTP 500', 'the tenant''s result is recorded');
SELECT is((SELECT consecutive_failures FROM pg_temp.rec(
              pg_temp.fail('30000000-0000-4000-8000-000000000202', 'unhealthy: HTTP 500'), 3, 201)),
          2, 'the next interval counts again');
SELECT is((SELECT consecutive_failures FROM pg_temp.rec(
              '[{"instance_id": "30000000-0000-4000-8000-000000000202", "ok": true, "health_status": "healthy"}]', 3, 201, false)),
          2, 'a tenant''s healthy probe does not reset the count either');

SELECT * FROM finish();
ROLLBACK;
