-- 155_restarted_when_restarted.sql: restarted_at (what a tenant's my-instance shows)
-- and the instance.restarted audit row record a restart when one happened: a
-- restart step that fell back to a create which did not give every app new
-- processes records neither (the restart stays owed); the step that does restart
-- records both, once.
BEGIN;
SELECT plan(8);
\ir _helpers.inc

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('71550000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE FUNCTION pg_temp.inst() RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = '71550000-0000-4000-8000-000000000001'
$$;
-- Claims the next step (or takes the one chained in p_chained) and finishes it
-- with p_result (the step's config_version added, and its restart_version when
-- p_restarted); returns "action:outcome" and keeps the answer in chained.
CREATE TEMP TABLE chained (v jsonb);
CREATE FUNCTION pg_temp.step(p_result jsonb, p_restarted boolean) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v jsonb := coalesce((SELECT c.v FROM chained c), public.lifecycle_claim('w1', 60)); f jsonb;
BEGIN
    DELETE FROM chained;
    f := public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
        p_result || jsonb_build_object('config_version', (v #>> '{step,config_version}')::bigint)
                 || CASE WHEN p_restarted THEN jsonb_build_object('restart_version',
                                                   (v #>> '{step,restart_version}')::bigint)
                         ELSE '{}' END, 60, 30, 3600);
    IF f ->> 'outcome' = 'claimed' THEN
        INSERT INTO chained VALUES (f);
    END IF;
    RETURN (v #>> '{step,action}') || ':' || (f ->> 'outcome');
END;
$$;
GRANT ALL ON chained TO service_role;
GRANT EXECUTE ON FUNCTION pg_temp.inst(), pg_temp.step(jsonb, boolean) TO service_role;

SET LOCAL role service_role;
SELECT is(public.lifecycle_provision('71550000-0000-4000-8000-000000000001')->>'outcome', 'ok', 'a new instance');
SELECT is(pg_temp.step('{"ok": true, "welcome_email": {"ok": false, "error": "skipped", "retry_in_s": 3600}}', true),
          'create:done', 'created and running');
RESET role;

-- The tenant asks a restart (as tenant_instance_restart records it).
UPDATE public.instances SET restart_version = restart_version + 1, restart_requested_at = now()
 WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
-- The restart found no app (404) and fell back to a create that left an app running
-- as it was: the worker's result carries no restart_version.
SELECT is(pg_temp.step('{"ok": true}', false), 'restart:claimed',
          'a restart done by a create that restarted nothing: the restart is owed again');
RESET role;
SELECT is((pg_temp.inst()).restarted_at, NULL, 'restarted_at is not set: nothing was restarted');
SELECT is((SELECT count(*)::int FROM public.audit_logs
            WHERE action = 'instance.restarted' AND details ->> 'instance_id' = (pg_temp.inst()).id::text),
          0, 'nor is a restart audited');
SET LOCAL role service_role;
SELECT is(pg_temp.step('{"ok": true}', true), 'restart:done', 'the restart itself');
RESET role;
SELECT isnt((pg_temp.inst()).restarted_at, NULL, 'sets restarted_at');
SELECT is((SELECT count(*)::int FROM public.audit_logs
            WHERE action = 'instance.restarted' AND details ->> 'instance_id' = (pg_temp.inst()).id::text
              AND (details ->> 'restart_version')::bigint = (pg_temp.inst()).restart_version),
          1, 'and is audited once, with the version it carried out');

SELECT * FROM finish();
ROLLBACK;
