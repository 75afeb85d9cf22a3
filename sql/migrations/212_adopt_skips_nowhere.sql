-- 212_adopt_skips_nowhere.sql: `mindroomctl target add --adopt` may ask whether an
-- instance was ever made anywhere.
--
-- --adopt gives the host DOKKU_PROVISIONER_URL points at every instance without a
-- target. It also took the instances waiting for room on the targets there were
-- (public.instance_nowhere: never placed, nor provisioned), which were made nowhere,
-- so a host registered with less room than their plan was overfilled, and their
-- create sent there regardless. It now leaves those to placement, and asks
-- instance_nowhere as service_role (mindroomctl's role), which 130 and 135 left
-- without EXECUTE on plain PostgreSQL (Supabase's default privileges grant it).

GRANT EXECUTE ON FUNCTION public.instance_nowhere(public.instances, uuid) TO service_role;
