-- 161_chain_waits_for_target.sql: a step chained after another (lifecycle_finish)
-- waits like a claimed one: an operator who disables a target while a step of it is
-- in flight gets no further call to it, and the work stays owed, saying why. Its own
-- slot still counts for the chained step: a target at its limit still chains.
BEGIN;
SELECT plan(7);
\ir _helpers.inc

INSERT INTO public.provisioner_targets (id, name, url, token_ref, scheduler, capacity_mb, max_in_flight)
VALUES (961, 'wedge', 'http://10.0.0.61:8002', 'env:WEDGE_TOKEN', 'docker-local', 100000, 1);
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('71610000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE FUNCTION pg_temp.inst() RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = '71610000-0000-4000-8000-000000000001'
$$;
-- Claims the next step (or takes the one chained before) and finishes it as done
-- (with its restart_version when p_restarted); returns "action:outcome".
CREATE TEMP TABLE chained (v jsonb);
CREATE FUNCTION pg_temp.step(p_restarted boolean) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v jsonb := coalesce((SELECT c.v FROM chained c), public.lifecycle_claim('w1', 60)); f jsonb;
BEGIN
    DELETE FROM chained;
    IF v ->> 'outcome' <> 'claimed' THEN
        RETURN 'nothing:' || (v ->> 'outcome');
    END IF;
    f := public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
        jsonb_build_object('ok', true, 'config_version', (v #>> '{step,config_version}')::bigint,
                           'welcome_email', '{"ok": false, "error": "skipped", "retry_in_s": 3600}'::jsonb)
        || CASE WHEN p_restarted THEN jsonb_build_object('restart_version', (v #>> '{step,restart_version}')::bigint)
                ELSE '{}' END,
        60, 30, 3600);
    IF f ->> 'outcome' = 'claimed' THEN
        INSERT INTO chained VALUES (f);
    END IF;
    RETURN (v #>> '{step,action}') || ':' || (f ->> 'outcome');
END;
$$;
GRANT ALL ON chained TO service_role;
GRANT EXECUTE ON FUNCTION pg_temp.inst(), pg_temp.step(boolean) TO service_role;

SET LOCAL role service_role;
SELECT is(public.lifecycle_provision('71610000-0000-4000-8000-000000000001')->>'outcome', 'ok', 'a new instance');
RESET role;
SELECT is((pg_temp.inst()).target_id, 961::bigint, 'placed on the target');

-- A restart asked while the create runs, on a target at its limit (this step's own
-- slot): the create chains it.
UPDATE public.instances SET restart_version = restart_version + 1, restart_requested_at = now()
 WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
SELECT is(pg_temp.step(false), 'create:claimed', 'a target at its limit: the next step is chained on its slot');
RESET role;

-- Another restart asked, and the target disabled, while that restart runs.
UPDATE public.instances SET restart_version = restart_version + 1, restart_requested_at = now()
 WHERE id = (pg_temp.inst()).id;
UPDATE public.provisioner_targets SET enabled = false WHERE id = 961;
SET LOCAL role service_role;
SELECT is(pg_temp.step(true), 'restart:done', 'the target disabled meanwhile: nothing more is chained to it');
RESET role;
SELECT is(ARRAY[(pg_temp.inst()).owed_action::text, (pg_temp.inst()).claimed_by,
                public.lifecycle_target_wait(pg_temp.inst())],
          ARRAY['restart', NULL, 'target_disabled'], 'the restart stays owed, no lease, waiting for the target');
SET LOCAL role service_role;
SELECT is(pg_temp.step(true), 'nothing:none', 'nor does a claim take it');
RESET role;

UPDATE public.provisioner_targets SET enabled = true WHERE id = 961;
SET LOCAL role service_role;
SELECT is(pg_temp.step(true), 'restart:done', 'enabled again: the restart is done');
RESET role;

SELECT * FROM finish();
ROLLBACK;
