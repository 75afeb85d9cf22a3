-- 164_restart_past_rejected_update.sql: a tenant's restart is carried out while an
-- update the provisioner rejected waits for an operator, whether the restart was
-- asked before or after the rejection; the update stays held after it. A restart
-- rejected too is held with it (never retried in a loop), and a cancellation's
-- destroy owed while an update ran that is then rejected is due. my-instance says
-- when the restart is held.
BEGIN;
SELECT plan(26);
\ir _helpers.inc

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('71590000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE FUNCTION pg_temp.inst() RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances
     WHERE subscription_id = coalesce(nullif(current_setting('test.sub', true), ''),
                                      '71590000-0000-4000-8000-000000000001')::uuid
$$;
-- Claims the next step (or takes the one chained) and finishes it with p_result (the
-- step's config_version and restart_version added); returns "action:outcome".
CREATE TEMP TABLE chained (v jsonb);
CREATE FUNCTION pg_temp.step(p_result jsonb) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v jsonb := coalesce((SELECT c.v FROM chained c), public.lifecycle_claim('w1', 60)); f jsonb;
BEGIN
    DELETE FROM chained;
    IF v -> 'step' IS NULL OR jsonb_typeof(v -> 'step') = 'null' THEN
        RETURN 'nothing due';
    END IF;
    f := public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
        p_result || jsonb_build_object('config_version', (v #>> '{step,config_version}')::bigint,
                                       'restart_version', (v #>> '{step,restart_version}')::bigint),
        60, 30, 3600);
    IF f ->> 'outcome' = 'claimed' THEN
        INSERT INTO chained VALUES (f);
    END IF;
    RETURN (v #>> '{step,action}') || ':' || (f ->> 'outcome');
END;
$$;
CREATE FUNCTION pg_temp.restart() RETURNS text LANGUAGE plpgsql AS $$
DECLARE r jsonb; v_id uuid := (pg_temp.inst()).id;
BEGIN
    PERFORM pg_temp.become('5eed5eed-0000-4000-8000-000000000001');
    r := public.tenant_instance_restart(v_id);
    PERFORM pg_temp.unbecome();
    RETURN r ->> 'outcome';
END;
$$;
-- What the tenant's my-instance shows of the restart: pending, held.
CREATE FUNCTION pg_temp.shown() RETURNS text LANGUAGE plpgsql AS $$
DECLARE r jsonb; v_id uuid := (pg_temp.inst()).id;
BEGIN
    PERFORM pg_temp.become('5eed5eed-0000-4000-8000-000000000001');
    r := public.tenant_instance(v_id) #> '{instance,restart}';
    PERFORM pg_temp.unbecome();
    RETURN 'pending ' || (r ->> 'pending') || ', held ' || coalesce(r ->> 'held', '-');
END;
$$;
GRANT ALL ON chained TO service_role;
GRANT EXECUTE ON FUNCTION pg_temp.inst(), pg_temp.step(jsonb) TO service_role;
CREATE FUNCTION pg_temp.owed() RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(i.owed_action::text, '-') || CASE WHEN i.owed_due_at IS NULL THEN ' held' ELSE ' due' END
      FROM pg_temp.inst() i
$$;

SET LOCAL role service_role;
SELECT is(public.lifecycle_provision('71590000-0000-4000-8000-000000000001')->>'outcome', 'ok', 'a new instance');
SELECT is(pg_temp.step('{"ok": true, "welcome_email": {"ok": true}}'), 'create:done', 'created and running');
RESET role;

-- A configuration change the provisioner rejects: the update waits for an operator.
UPDATE public.instances SET storage_gb = storage_gb + 1 WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
SELECT is(pg_temp.step('{"ok": false, "rejected": true, "error": "HTTP 422: storage cannot shrink"}'),
          'update:failed', 'the update is rejected');
RESET role;
SELECT is(pg_temp.owed(), 'update held', 'and held');

-- The tenant asks a restart: it is due, and carried out; the update is then tried
-- once more and held again.
SELECT is(pg_temp.restart(), 'ok', 'the tenant asks a restart');
SELECT is(pg_temp.owed(), 'restart due', 'the restart is due past the held update');
SELECT is(pg_temp.shown(), 'pending true, held false', 'my-instance: pending, not held');
SET LOCAL role service_role;
SELECT is(pg_temp.step('{"ok": true}'), 'restart:claimed', 'the restart is done, the update follows');
SELECT is(pg_temp.step('{"ok": false, "rejected": true, "error": "HTTP 422: storage cannot shrink"}'),
          'update:failed', 'rejected again');
RESET role;
SELECT is((SELECT pg_temp.owed() || ', pending ' || (i.restart_version > i.applied_restart_version)
             FROM pg_temp.inst() i), 'update held, pending false', 'held again; no restart pending');

-- A restart asked while the update is in flight, then rejected: carried out too.
UPDATE public.instances SET next_attempt_at = now() WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
INSERT INTO chained SELECT public.lifecycle_claim('w1', 60);
RESET role;
SELECT is(pg_temp.restart(), 'ok', 'the tenant asks a restart while the update is in flight');
SET LOCAL role service_role;
SELECT is(pg_temp.step('{"ok": false, "rejected": true, "error": "HTTP 422: storage cannot shrink"}'),
          'update:failed', 'the update is rejected');
RESET role;
SELECT is(pg_temp.owed(), 'restart due', 'a restart asked during the rejected update is due');

-- The restart rejected too (its app gone, the POST /apps that makes it again
-- rejected): both are held, nothing is tried again until an operator asks.
SET LOCAL role service_role;
SELECT is(pg_temp.step('{"ok": false, "rejected": true, "error": "HTTP 422: storage cannot shrink"}'),
          'restart:failed', 'the restart is rejected');
SELECT is(pg_temp.step('{"ok": true}'), 'nothing due', 'nothing is tried again');
RESET role;
SELECT is(pg_temp.owed(), 'restart held', 'the restart is held, with the update');
SELECT is(pg_temp.shown(), 'pending true, held true', 'my-instance: the restart is held');

-- An operator asks again: the update is tried, rejected, and the restart goes ahead
-- of it again.
SET LOCAL role service_role;
SELECT is(public.lifecycle_provision('71590000-0000-4000-8000-000000000001')->>'outcome', 'ok', 'an operator asks again');
SELECT is(pg_temp.step('{"ok": false, "rejected": true, "error": "HTTP 422: storage cannot shrink"}')
          || ' ' || pg_temp.step('{"ok": true}')
          || ' ' || pg_temp.step('{"ok": false, "rejected": true, "error": "HTTP 422: storage cannot shrink"}'),
          'update:failed restart:claimed update:failed',
          'the update is rejected, the restart is done, the update rejected again');
RESET role;
SELECT is(pg_temp.owed(), 'update held', 'the update is held');
SELECT is(pg_temp.shown(), 'pending false, held false', 'my-instance: restarted, nothing held');

-- Another instance: a cancellation arrives while an update is in flight, which the
-- provisioner then rejects: the destroy is due.
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('71592222-0000-4000-8000-000000000002', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
SET LOCAL test.sub = '71592222-0000-4000-8000-000000000002';
SET LOCAL role service_role;
SELECT is(public.lifecycle_provision('71592222-0000-4000-8000-000000000002')->>'outcome', 'ok', 'another instance');
SELECT is(pg_temp.step('{"ok": true, "welcome_email": {"ok": true}}'), 'create:done', 'created and running');
RESET role;
UPDATE public.instances SET storage_gb = storage_gb + 1 WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
INSERT INTO chained SELECT public.lifecycle_claim('w1', 60);
SELECT is((public.instance_request((pg_temp.inst()).id, 'deprovisioned')).desired_status::text,
          'deprovisioned', 'the webhook records a cancellation while the update is in flight');
SELECT is(pg_temp.step('{"ok": false, "rejected": true, "error": "HTTP 422: storage cannot shrink"}'),
          'update:failed', 'the update is rejected');
RESET role;
SELECT is(pg_temp.owed(), 'destroy due', 'the cancellation''s destroy is due');

SELECT * FROM finish();
ROLLBACK;
