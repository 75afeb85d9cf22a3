-- 171_tenant_error_text.sql: a failed step tells the tenant which step failed and what
-- happens next (error_message, my-instance's instance.error), never the provisioner's
-- text, which stays in last_error for the operators and which a tenant cannot read.
BEGIN;
SELECT plan(16);
\ir _helpers.inc

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('7171000a-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO service_role, authenticated;
CREATE FUNCTION pg_temp.inst() RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = '7171000a-0000-4000-8000-000000000001'
$$;
CREATE FUNCTION pg_temp.finish(p_k text, p_result jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
                                   p_result || jsonb_build_object('config_version', (v #>> '{step,config_version}')::bigint),
                                   60, 30, 3600) FROM r WHERE k = p_k
$$;
-- my-instance's answer as the tenant gets it, kept under k.
CREATE FUNCTION pg_temp.tenant_view(p_k text) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.run('5eed5eed-0000-4000-8000-000000000001',
                       format('INSERT INTO r SELECT %L, public.tenant_instance(%L)', p_k, (pg_temp.inst()).id))
$$;
GRANT EXECUTE ON FUNCTION pg_temp.inst(), pg_temp.finish(text, jsonb) TO service_role;

-- Least privilege: the provisioner's text is the operators'.
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001', 'SELECT last_error FROM public.instances'),
          'err:42501', 'a tenant cannot read last_error');
SELECT is(pg_temp.cell('anon', $$SELECT public.instance_step_error('create', false)$$),
          'err:42501', 'the wording function is not anon''s (tenants run it since 172)');

-- The create fails with what a provisioner says: an address, a path.
SET LOCAL role service_role;
SELECT is(public.lifecycle_provision('7171000a-0000-4000-8000-000000000001')->>'outcome', 'ok', 'a customer');
INSERT INTO r VALUES ('c1', public.lifecycle_claim('w1', 60));
SELECT is(pg_temp.finish('c1', '{"ok": false, "error": "POST http://10.9.8.7:8002/apps: HTTP 500: dokku apps:create failed (token /etc/mindroom/dokku.token)"}')
          ->> 'outcome', 'failed', 'the create failed');
SELECT is(ARRAY[(pg_temp.inst()).status::text, (pg_temp.inst()).error_message],
          ARRAY['failed', 'Setting up your instance failed: it is tried again automatically.'],
          'the tenant''s text says which step failed and that it is retried');
SELECT ok((pg_temp.inst()).last_error LIKE 'POST http://10.9.8.7:8002/apps: HTTP 500%',
          'the operators keep the provisioner''s text');
RESET role;
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001',
                       $$SELECT 1 FROM public.instances WHERE error_message LIKE 'Setting up your instance failed:%'$$),
          'ok:1', 'the tenant reads its text in error_message');
SELECT is(pg_temp.tenant_view('t1'), 'ok:1', 'my-instance answers the tenant');
SELECT is((SELECT ARRAY[v #>> '{instance,status}', v #>> '{instance,error}', v #>> '{health,status}'] FROM r WHERE k = 't1'),
          ARRAY['failed', 'Setting up your instance failed: it is tried again automatically.', 'not_checked'],
          'my-instance says what went wrong with the failed instance');
SELECT ok((SELECT v::text NOT LIKE '%10.9.8.7%' AND v::text NOT LIKE '%dokku%' FROM r WHERE k = 't1'),
          'and nothing of the provisioner''s text');

-- The retry is rejected: it waits for an operator.
UPDATE public.instances SET next_attempt_at = now() WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
INSERT INTO r VALUES ('c2', public.lifecycle_claim('w1', 60));
SELECT is(pg_temp.finish('c2', '{"ok": false, "rejected": true, "error": "HTTP 422: image registry.internal:5000/mindroom not found"}')
          ->> 'outcome', 'failed', 'the retry is rejected');
SELECT is(ARRAY[(pg_temp.inst()).error_message, (pg_temp.inst()).rejected_actions::text],
          ARRAY['Setting up your instance failed: it waits for an operator.', '{create}'],
          'the tenant is told it waits for an operator; the hold stands as before');

-- An operator asks again and it is made: nothing left to tell.
SELECT is(public.lifecycle_provision('7171000a-0000-4000-8000-000000000001')->>'outcome', 'ok', 'asked again');
INSERT INTO r VALUES ('c3', public.lifecycle_claim('w1', 60));
SELECT is(pg_temp.finish('c3', '{"ok": true, "welcome_email": {"ok": true}}') ->> 'outcome', 'done', 'made');
RESET role;
SELECT is(pg_temp.tenant_view('t2'), 'ok:1', 'my-instance answers again');
SELECT is((SELECT ARRAY[v #>> '{instance,status}', v #>> '{instance,error}', (pg_temp.inst()).error_message,
                        (pg_temp.inst()).last_error] FROM r WHERE k = 't2'),
          ARRAY['running', NULL, NULL, NULL], 'running: no error anywhere');

SELECT * FROM finish();
ROLLBACK;
