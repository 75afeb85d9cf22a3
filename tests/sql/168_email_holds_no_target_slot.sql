-- 168_email_holds_no_target_slot.sql: the welcome email's lease takes no slot of its
-- instance's target: a new customer's create on a target with one slot is handed out
-- while another instance's email is in flight; a step owed after the email is chained
-- only when the target has a free slot (the email had none to pass on).
BEGIN;
SELECT plan(10);
\ir _helpers.inc

INSERT INTO public.provisioner_targets (id, name, url, token_ref, scheduler, capacity_mb, max_in_flight)
VALUES (968, 'mail', 'http://10.0.0.68:8002', 'env:MAIL_TOKEN', 'docker-local', 1000000, 1);
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('7168000a-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'),
  ('7168000b-0000-4000-8000-000000000002', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO service_role;
CREATE FUNCTION pg_temp.inst(p_n int) RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances
     WHERE subscription_id = (CASE p_n WHEN 1 THEN '7168000a-0000-4000-8000-000000000001'
                                       ELSE '7168000b-0000-4000-8000-000000000002' END)::uuid
$$;
CREATE FUNCTION pg_temp.finish(p_k text, p_result jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
                                   p_result || jsonb_build_object('config_version', (v #>> '{step,config_version}')::bigint),
                                   60, 30, 3600) FROM r WHERE k = p_k
$$;
GRANT EXECUTE ON FUNCTION pg_temp.inst(int), pg_temp.finish(text, jsonb) TO service_role;
SET LOCAL role service_role;

-- I1 is made; its create chains the welcome email (a Resend key: nothing recorded for it).
SELECT is(public.lifecycle_provision('7168000a-0000-4000-8000-000000000001')->>'outcome', 'ok', 'a first customer');
INSERT INTO r VALUES ('c1', public.lifecycle_claim('w1', 60));
INSERT INTO r VALUES ('e1', pg_temp.finish('c1', '{"ok": true, "frontend_url": "https://m1.example"}'));
SELECT is((SELECT ARRAY[v ->> 'outcome', v #>> '{step,action}'] FROM r WHERE k = 'e1'), ARRAY['claimed', 'email'],
          'its create is done and chains the welcome email');
SELECT is(public.target_in_flight(968), 0, 'the email in flight takes no slot of the target');

-- I2 arrives while I1's email is in flight: its create is not held back.
SELECT is(public.lifecycle_provision('7168000b-0000-4000-8000-000000000002')->>'outcome', 'ok', 'a second customer');
SELECT is(public.lifecycle_target_wait(pg_temp.inst(2)), NULL, 'placed on the same target, its create does not wait');
INSERT INTO r VALUES ('c2', public.lifecycle_claim('w2', 60));
SELECT is((SELECT ARRAY[v #>> '{step,action}', v #>> '{step,instance_id}'] FROM r WHERE k = 'c2'),
          ARRAY['create', (pg_temp.inst(2)).id::text], 'the claim hands it out at once');

-- An update of I1 is asked while its email runs; I2's create holds the only slot.
RESET role;
UPDATE public.instances SET config_version = config_version + 1 WHERE id = (pg_temp.inst(1)).id;
SET LOCAL role service_role;
SELECT is(pg_temp.finish('e1', '{"ok": true}') ->> 'outcome', 'done',
          'the email is sent; the update is not chained onto a slot the email never had');
SELECT is(ARRAY[(pg_temp.inst(1)).owed_action::text, (pg_temp.inst(1)).claimed_by,
                public.lifecycle_target_wait(pg_temp.inst(1))],
          ARRAY['update', NULL, 'target_busy'], 'the update stays owed, no lease, waiting for the slot');
SELECT is(pg_temp.finish('c2', '{"ok": true, "welcome_email": {"ok": false, "error": "skipped", "retry_in_s": 3600}}') ->> 'outcome',
          'done', 'I2''s create is done');
SELECT is(public.lifecycle_claim('w1', 60) #>> '{step,action}', 'update', 'the slot free, the update is claimed');

SELECT * FROM finish();
ROLLBACK;
