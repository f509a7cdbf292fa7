#!/bin/sh
# >>> gitlora managed hook <<< (do not edit: `gitlora install` rewrites it, `gitlora uninstall` removes it)
# gitlora post-rewrite hook, template v1: buffers stdin ("old new [extra]" lines), runs the hook it replaced
# (if any) with the same arguments and the same stdin, then appends one line per rewritten commit to gitlora's
# spool: post-rewrite TAB new-oid TAB unix-time TAB old-oid TAB amend|rebase.
# If stdin carried no pairs (a wrapper such as pre-commit calls us with empty stdin), one line with new-oid =
# HEAD and an empty old-oid is written instead. Never fails the git command: our own errors are discarded, the
# exit status is the chained hook's.
gitlora_spool=@SPOOL@
gitlora_chained=@CHAINED@
gitlora_repo=@REPO@
gitlora_status=0
gitlora_input=$(cat; echo .)
gitlora_input=${gitlora_input%.}
if [ -n "$gitlora_chained" ] && [ -x "$gitlora_chained" ]; then
	printf '%s' "$gitlora_input" | "$gitlora_chained" "$@"
	gitlora_status=$?
fi
{
	# installed into a core.hooksPath dir (maybe shared by other repositories): spool only our repository
	if [ -n "$gitlora_repo" ]; then
		[ "$(git rev-parse --path-format=absolute --git-common-dir)" = "$gitlora_repo" ] || exit $gitlora_status
	fi
	gitlora_n=0
	gitlora_now=$(date +%s)
	[ -d "${gitlora_spool%/*}" ] || mkdir -p "${gitlora_spool%/*}"
	while read -r gitlora_old gitlora_new gitlora_extra; do
		[ -n "$gitlora_new" ] || continue
		printf 'post-rewrite\t%s\t%s\t%s\t%s\n' "$gitlora_new" "$gitlora_now" "$gitlora_old" "$1" >>"$gitlora_spool"
		gitlora_n=1
	done <<gitlora_EOF
$gitlora_input
gitlora_EOF
	if [ $gitlora_n = 0 ]; then
		gitlora_oid=$(git rev-parse -q --verify HEAD) &&
		printf 'post-rewrite\t%s\t%s\t\t%s\n' "$gitlora_oid" "$gitlora_now" "$1" >>"$gitlora_spool"
	fi
} </dev/null >/dev/null 2>&1
exit $gitlora_status
