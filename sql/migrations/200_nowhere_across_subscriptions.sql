-- 200_nowhere_across_subscriptions.sql: an instance that took over the kept data
-- of an instance of another subscription of its account is not "nowhere".
--
-- public.instance_nowhere (135) says nothing of an instance exists on any
-- provisioner: inserted while targets existed and none had room, never placed nor
-- provisioned since, and holding no destroyed instance's kept storage. It looked for
-- that storage among the rows of the instance's own subscription alone, as only the
-- same subscription provisioned again could take data over when it was written.
-- Since 186 a customer's new subscription takes over the kept data of its cancelled
-- one, so such a taker was called "nowhere" while that data lay on
-- DOKKU_PROVISIONER_URL under its names:
-- - its destroy (the new subscription cancelled while it still waited for room) was
--   recorded done by the claim without calling anyone, and its storage marked
--   destroyed: the old row still named it as taker, so nothing owed the data's
--   destruction any more, nor offered it back, and it stayed there for good;
-- - with the account erased, the taker's row deleted before the old one recorded no
--   teardown, and the old row's trigger then found its taker gone: the data was never
--   erased.
-- Now any destroyed row that names the instance as its taker counts, whatever its
-- subscription (instances_storage_taken_by_idx finds them).

CREATE OR REPLACE FUNCTION public.instance_nowhere(i public.instances, p_gone uuid)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
    RETURN i.target_id IS NULL AND i.provisioned_at IS NULL AND i.placement_waited
       AND EXISTS (SELECT 1 FROM public.provisioner_targets)
       AND NOT EXISTS (SELECT 1 FROM public.instances x
                        WHERE x.storage_taken_by = i.id AND x.id IS DISTINCT FROM p_gone);
END;
$$;

