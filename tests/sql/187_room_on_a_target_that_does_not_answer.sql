-- 187_room_on_a_target_that_does_not_answer.sql: an instance that waited for room is
-- placed on a target that does not answer when no other has room for it (as a new
-- sign-up is), instead of waiting while customers after it are placed there.
BEGIN;
SELECT plan(4);
\ir _helpers.inc

INSERT INTO public.provisioner_targets (id, name, url, token_ref, scheduler, capacity_mb)
VALUES (1871, 'near-full', 'http://10.0.18.71:8002', 'env:NEAR_FULL_TOKEN', 'docker-local', 2000),
       (1872, 'down', 'http://10.0.18.72:8002', 'env:DOWN_TOKEN', 'docker-local', 1);
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('a1870000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid,
       '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'
  FROM generate_series(1, 3) n;
CREATE FUNCTION pg_temp.place(p_n integer) RETURNS void LANGUAGE sql AS $$
    INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
    VALUES (('a1870000-0000-4000-8000-' || lpad(p_n::text, 12, '0'))::uuid,
            'mindroom-a187' || p_n, 'ma187' || p_n)
$$;
CREATE FUNCTION pg_temp.target_of(p_n integer) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(t.name, public.lifecycle_target_wait(i))
      FROM public.instances i LEFT JOIN public.provisioner_targets t ON t.id = i.target_id
     WHERE i.dokku_app_name = 'mindroom-a187' || p_n
$$;
GRANT EXECUTE ON FUNCTION pg_temp.place(integer), pg_temp.target_of(integer) TO service_role;
SET LOCAL role service_role;

-- One starter fills near-full (a starter reserves more than half of 2000 MB); the
-- second finds no room anywhere and waits.
SELECT pg_temp.place(1);
SELECT pg_temp.place(2);
SELECT is(pg_temp.target_of(1) || ' ' || pg_temp.target_of(2), 'near-full no_capacity',
          'the second starter waits for room');

-- down gets room but stops answering; near-full still answers with room for none.
UPDATE public.provisioner_targets SET capacity_mb = 100000 WHERE id = 1872;
SELECT public.target_answered('down', false);
SELECT is(public.target_choose((SELECT public.instance_reserved_mb(i) FROM public.instances i
                                 WHERE i.dokku_app_name = 'mindroom-a1872')),
          1872::bigint, 'the rule puts a starter on down: it fits nowhere else');
SELECT public.lifecycle_claim('t187', 60)->>'outcome';
SELECT is(pg_temp.target_of(2), 'down', 'the waiting starter is placed on down at the next claim');
SELECT pg_temp.place(3);
SELECT is(pg_temp.target_of(3), 'down', 'as a new sign-up is');

SELECT * FROM finish();
ROLLBACK;
