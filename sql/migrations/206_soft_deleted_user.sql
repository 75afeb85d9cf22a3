-- 206_soft_deleted_user.sql: a user Supabase Auth deletes softly is deleted here too.
--
-- Supabase Auth deletes a user in one of two ways. The Dashboard's delete, and the
-- admin API's DELETE /admin/users/{id}, remove the row from auth.users, and the
-- cascade ends the account: its subscriptions are cancelled at Stripe
-- (137_stripe_cancellations.sql), its instances torn down (060_instance.sql), its
-- customers recorded (142_deleted_account_late_subscription.sql). With
-- {"should_soft_delete": true} the admin API instead keeps the row: one UPDATE sets
-- deleted_at and replaces the email and phone with obfuscated values, and the user
-- can never sign in again. Nothing here ended: Stripe kept charging a customer who no
-- longer had a user, the instance kept running, and the email change was copied to
-- the account (handle_new_user, on_auth_user_email_changed).
--
-- Now:
-- - on_auth_user_soft_deleted (new) deletes the account, in the same transaction,
--   when a user's deleted_at is set: the same delete, and so the same cascade and
--   triggers, as removing the row;
-- - public.handle_new_user (004_triggers.sql, redefined) makes or updates no account
--   for a deleted user, so that the obfuscated email (the same UPDATE) neither
--   follows to the account nor makes it again.
--
-- The minimal auth.users of plain PostgreSQL (000_supabase_compat.sql) has no
-- deleted_at, and this migration adds none (it never alters auth.users): both read
-- the column through to_jsonb, which is NULL where it does not exist, so the same
-- definitions deploy unchanged on Supabase and on plain PostgreSQL (where a user is
-- deleted with DELETE FROM auth.users). A trigger on every update of auth.users
-- (Supabase Auth writes a sign-in's last_sign_in_at there) costs one to_jsonb of
-- each row in its WHEN, under a microsecond beside the update.

CREATE OR REPLACE FUNCTION public.handle_new_user()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF NEW.email IS NULL OR (to_jsonb(NEW) ->> 'deleted_at') IS NOT NULL THEN
        RETURN NEW;
    END IF;
    INSERT INTO public.accounts (id, email, full_name)
    VALUES (NEW.id, NEW.email, NEW.raw_user_meta_data ->> 'full_name')
    ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email
        WHERE public.accounts.email IS DISTINCT FROM EXCLUDED.email;
    RETURN NEW;
END;
$$;

-- Runs as the role that writes auth.users (supabase_auth_admin on Supabase), hence
-- SECURITY DEFINER, as handle_new_user.
CREATE FUNCTION public.handle_user_soft_deleted()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    DELETE FROM public.accounts WHERE id = NEW.id;
    RETURN NEW;
END;
$$;
REVOKE ALL ON FUNCTION public.handle_user_soft_deleted() FROM PUBLIC, anon, authenticated;

CREATE TRIGGER on_auth_user_soft_deleted AFTER UPDATE ON auth.users
    FOR EACH ROW
    WHEN ((to_jsonb(OLD) ->> 'deleted_at') IS NULL AND (to_jsonb(NEW) ->> 'deleted_at') IS NOT NULL)
    EXECUTE FUNCTION public.handle_user_soft_deleted();
