-- 91_ops.sql: what /metrics reads from the database (090_ops.sql, 091_ops_retention.sql):
-- a destroyed instance's data waiting out its retention is scheduled work, not owed
-- work growing old; once due, its age runs from the end of the retention.
BEGIN;
SELECT plan(5);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('91000000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
SET LOCAL role service_role;
SELECT set_config('t.iid', public.lifecycle_provision('91000000-0000-4000-8000-000000000001') #>> '{instance,id}', true);
SELECT is((SELECT o -> 'count' FROM jsonb_array_elements(public.ops_metrics() -> 'owed') o
            WHERE o ->> 'action' = 'create'), '1'::jsonb, 'a new instance owes its create');
SELECT is(public.lifecycle_deprovision(current_setting('t.iid')::uuid, NULL, 'destroy', false)
            #>> '{instance,owed_action}', 'destroy', 'destroy owed');
RESET role;
UPDATE public.instances SET status = 'deprovisioning' WHERE id = current_setting('t.iid')::uuid;
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now() - interval '40 days',
       storage_destroy_after = now() + interval '29 days' WHERE id = current_setting('t.iid')::uuid;
-- Owed since the destroy, forty days ago.
UPDATE public.instances SET owed_since = now() - interval '40 days' WHERE id = current_setting('t.iid')::uuid;

CREATE FUNCTION pg_temp.storage_owed() RETURNS jsonb LANGUAGE sql AS $$
    SELECT o - 'action' FROM jsonb_array_elements(public.ops_metrics() -> 'owed') o
     WHERE o ->> 'action' = 'destroy_storage'
$$;
SET LOCAL role service_role;
SELECT is(pg_temp.storage_owed(),
          '{"count": 0, "held": 0, "in_flight": 0, "oldest_s": 0, "scheduled": 1}'::jsonb,
          'within its retention: scheduled, not owed, no age');
RESET role;
UPDATE public.instances SET storage_destroy_after = now() - interval '1 hour'
 WHERE id = current_setting('t.iid')::uuid;
SET LOCAL role service_role;
SELECT is(pg_temp.storage_owed() - 'oldest_s',
          '{"count": 1, "held": 0, "in_flight": 0, "scheduled": 0}'::jsonb, 'due: owed work');
SELECT is((pg_temp.storage_owed() ->> 'oldest_s')::numeric, 3600.000,
          'as old as the time since the retention ended, not since the destroy');

SELECT * FROM finish();
ROLLBACK;
