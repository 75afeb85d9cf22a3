-- 116_dry_run_not_probed.sql: lifecycle_finish records whether a deploy was a dry run
-- (the provisioner's "dry_run", passed on by the worker); tenants read the flag.
BEGIN;
SELECT plan(8);
\ir _helpers.inc

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('71600000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO service_role;
CREATE FUNCTION pg_temp.dry() RETURNS boolean LANGUAGE sql AS $$
    SELECT dry_run FROM public.instances WHERE subscription_id = '71600000-0000-4000-8000-000000000001'
$$;
-- Claims the next step and finishes it with p_result (the step's config_version added).
CREATE FUNCTION pg_temp.step(p_k text, p_result jsonb) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v jsonb := public.lifecycle_claim('w1', 60);
BEGIN
    INSERT INTO r VALUES (p_k, v);
    RETURN (v #>> '{step,action}') || ':' || (public.lifecycle_finish((v #>> '{step,instance_id}')::uuid,
        v #>> '{step,token}', p_result || jsonb_build_object('config_version',
        (v #>> '{step,config_version}')::bigint), 60, 30, 3600) ->> 'outcome');
END;
$$;
GRANT EXECUTE ON FUNCTION pg_temp.dry(), pg_temp.step(text, jsonb) TO service_role;
-- Makes the next update due (as a plan change would).
CREATE FUNCTION pg_temp.bump() RETURNS void LANGUAGE sql AS $$
    UPDATE public.instances SET config_version = config_version + 1
     WHERE subscription_id = '71600000-0000-4000-8000-000000000001'
$$;

SET LOCAL role service_role;
SELECT is(public.lifecycle_provision('71600000-0000-4000-8000-000000000001')->>'outcome', 'ok', 'a new instance');
SELECT is(pg_temp.dry(), false, 'not a dry run before any deploy');
SELECT is(pg_temp.step('c1', '{"ok": true, "dry_run": true, "backend_url": "http://m.mindroom.localhost/api",
                              "welcome_email": {"ok": false, "error": "skipped", "retry_in_s": 3600}}'),
          'create:done', 'a dry-run provisioner created it');
SELECT is(pg_temp.dry(), true, 'recorded: its last deploy was a dry run');

RESET role;
SELECT pg_temp.bump();
SET LOCAL role service_role;
SELECT is(pg_temp.step('u1', '{"ok": true}'), 'update:done',
          'an update by a provisioner whose answer does not say');
SELECT is(pg_temp.dry(), true, 'leaves the flag as it was');

RESET role;
SELECT pg_temp.bump();
SET LOCAL role service_role;
SELECT is(pg_temp.step('u2', '{"ok": true, "dry_run": false}') || ' ' || pg_temp.dry()::text,
          'update:done false', 'a deploy through a provisioner that runs Dokku clears it');
RESET role;

SELECT ok(has_column_privilege('authenticated', 'public.instances', 'dry_run', 'SELECT')
          AND NOT has_column_privilege('authenticated', 'public.instances', 'dry_run', 'UPDATE'),
          'tenants read the flag and cannot set it');

SELECT * FROM finish();
