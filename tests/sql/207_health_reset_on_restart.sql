-- 207_health_reset_on_restart.sql: a restart carried out on a running instance
-- starts its health count afresh and shows no result from before it, as an
-- instance that became running does; the next failed check after it does not fail
-- the instance. A step that restarted nothing (an update) keeps the count.
BEGIN;
SELECT plan(9);
\ir _helpers.inc

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('72070000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE FUNCTION pg_temp.inst() RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = '72070000-0000-4000-8000-000000000001'
$$;
-- Claims the next step and finishes it with p_result (the step's config_version
-- added, and its restart_version when p_restarted); returns "action:outcome".
CREATE FUNCTION pg_temp.step(p_result jsonb, p_restarted boolean) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v jsonb := public.lifecycle_claim('w1', 60); f jsonb;
BEGIN
    f := public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
        p_result || jsonb_build_object('config_version', (v #>> '{step,config_version}')::bigint)
                 || CASE WHEN p_restarted THEN jsonb_build_object('restart_version',
                                                   (v #>> '{step,restart_version}')::bigint)
                         ELSE '{}' END, 60, 30, 3600);
    RETURN (v #>> '{step,action}') || ':' || (f ->> 'outcome');
END;
$$;
GRANT EXECUTE ON FUNCTION pg_temp.inst(), pg_temp.step(jsonb, boolean), pg_temp.health_fails(uuid, integer) TO service_role;

SET LOCAL role service_role;
SELECT public.lifecycle_provision('72070000-0000-4000-8000-000000000001');
SELECT is(pg_temp.step('{"ok": true, "welcome_email": {"ok": false, "error": "skipped", "retry_in_s": 3600}}', true),
          'create:done', 'created and running');
SELECT pg_temp.health_fails((pg_temp.inst()).id, 0), pg_temp.health_fails((pg_temp.inst()).id, 1);
SELECT is((pg_temp.inst()).consecutive_failures, 2, 'two checks in a row failed');
RESET role;

-- The tenant asks a restart (as tenant_instance_restart records it), which is done.
UPDATE public.instances SET restart_version = restart_version + 1, restart_requested_at = now()
 WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
SELECT is(pg_temp.step('{"ok": true}', true), 'restart:done', 'the restart');
SELECT results_eq($$SELECT status::text, consecutive_failures, health_status, last_health_check
                      FROM pg_temp.inst()$$,
                  $$VALUES ('running', 0, NULL::text, NULL::timestamptz)$$,
                  'the restarted instance counts afresh and shows no result from before the restart');
SELECT is(pg_temp.health_fails((pg_temp.inst()).id, 2), false, 'a failed check while it starts again does not fail it');
SELECT results_eq($$SELECT status::text, consecutive_failures FROM pg_temp.inst()$$,
                  $$VALUES ('running', 1)$$, 'it is the first of a new count');
RESET role;

-- A plan change: the update carries out no restart, and the count stays.
UPDATE public.instances SET memory_limit_mb = memory_limit_mb + 256 WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
SELECT is(pg_temp.step('{"ok": true}', false), 'update:done', 'an update');
SELECT results_eq($$SELECT consecutive_failures, health_status FROM pg_temp.inst()$$,
                  $$VALUES (1, 'unreachable: timeout after 5000 ms')$$,
                  'keeps the count and the last result: it restarted nothing');
SELECT is((pg_temp.health_fails((pg_temp.inst()).id, 3), pg_temp.health_fails((pg_temp.inst()).id, 4))::text, '(f,t)',
          'and the threshold is reached after three failed checks since the restart');
RESET role;

SELECT * FROM finish();
ROLLBACK;
